"""The ground every other part stands on: settings, errors, files, image reading, catalogue areas, the model contract.

Nothing here imports anything of lookalike above it (the protocol, the engines, the commands).
"""
