# frozen_string_literal: true

module Inventory
  class Item
    attr_reader :sku, :name, :qty

    def initialize(sku:, name:, qty: 0)
      @sku = sku
      @name = name
      @qty = Integer(qty)
    end

    def restock!(n)
      raise ArgumentError, "n must be positive (got #{n})" unless n.positive?

      @qty += n
      self
    end

    def to_s = "#{sku}: #{name} x#{qty}"
  end

  def self.load(path)
    File.readlines(path, chomp: true).filter_map do |line|
      next if line.start_with?('#') || line.strip.empty?

      sku, name, qty = line.split(',', 3)
      Item.new(sku: sku, name: name.strip, qty: qty.to_i)
    end
  end
end

items = Inventory.load(ARGV.fetch(0, 'stock.csv'))
items.select { |i| i.qty < 5 }.each { |i| puts i.restock!(10) }
