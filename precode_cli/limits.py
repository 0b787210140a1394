"""The ranges of what a file or an option may ask for, in one place (docs/security.md#limits).

Beyond them a file is refused as malformed (`precode_cli/schemas.py`) and an option as out of range
(`precode_cli/commands/`); inside them, what building and running would cost is budgeted separately
(`precode_cli/budget.py`). Kept free of imports so that `precode --help` stays fast.
"""

MAX_SIDE = 1024  # pixels per image side
MAX_CHANNELS = 4
MAX_CLASSES = 100_000
MAX_BATCH = 4096  # images behind one gradient
MAX_WIDTH = 1_000_000  # a builder's width option
MAX_K = 1_000_000  # PRECODE's latent Gaussians
MAX_IMPRINT_BINS = 65_536  # bins of a malicious server's imprint module (capture --threat imprint)
MAX_EPOCHS = 100_000
MAX_ITERATIONS = 1_000_000
MAX_RESTARTS = 1_000
MAX_LOCAL_STEPS = 10_000  # SGD steps of one client's local training (FedAvg)
MAX_GROUP = 1_024  # dumps attacked together (--vectorize)
MAX_DEFENSES = 8
MAX_SEED = 2**64 - 1
MAX_JSON_DEPTH = 32
