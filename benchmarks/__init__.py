"""Benchmarks of dlr: step time, memory, the loss, the loader, the fold, and the roofline and
traffic models that bound a step. Run each from the repository root as `python -m benchmarks.NAME`;
README.md holds the measured figures and the hardware they were measured on."""
