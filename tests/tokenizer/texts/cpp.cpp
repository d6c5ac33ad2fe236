#include <algorithm>
#include <cstdint>
#include <iostream>
#include <memory>
#include <unordered_map>
#include <vector>

namespace geo {

template <typename T>
struct Point {
    T x{}, y{};
    constexpr Point operator+(const Point& o) const noexcept { return {x + o.x, y + o.y}; }
    bool operator==(const Point&) const = default;
};

class Graph {
public:
    explicit Graph(std::size_t n) : adj_(n) {}
    void add_edge(std::size_t u, std::size_t v) {
        adj_.at(u).push_back(v);
        adj_.at(v).push_back(u);
    }
    [[nodiscard]] std::vector<std::size_t> bfs(std::size_t src) const;

private:
    std::vector<std::vector<std::size_t>> adj_;
};

std::vector<std::size_t> Graph::bfs(std::size_t src) const {
    std::vector<std::size_t> dist(adj_.size(), SIZE_MAX), queue{src};
    dist[src] = 0;
    for (std::size_t head = 0; head < queue.size(); ++head) {
        auto u = queue[head];
        for (auto v : adj_[u]) {
            if (dist[v] == SIZE_MAX) { dist[v] = dist[u] + 1; queue.push_back(v); }
        }
    }
    return dist;
}

}  // namespace geo

int main(int argc, char** argv) {
    auto g = std::make_unique<geo::Graph>(5);
    g->add_edge(0, 1); g->add_edge(1, 2); g->add_edge(3, 4);
    for (auto d : g->bfs(0)) std::cout << (d == SIZE_MAX ? -1 : static_cast<long>(d)) << ' ';
    std::cout << std::endl;
    return argc > 1 && argv[1][0] == '-' ? 1 : 0;
}
