class Stack:
	def __init__(self):
		self._items = []

	def push(self, x):
		self._items.append(x)
		return self

	def pop(self):
		if not self._items:
			raise IndexError("pop from empty stack")
		return self._items.pop()
