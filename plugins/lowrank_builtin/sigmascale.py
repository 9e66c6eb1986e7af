"""(being written)"""

STRATEGIES: list[type] = []
