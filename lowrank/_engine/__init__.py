"""The engine: model discovery, block-input capture, statistics, gradients, the block pass, the
global planner and ``compress``. It imports the contract and nothing above it."""
