"""The rectified-flow math with no model in it: timestep schemes, shift, loss and fixed-t validation (`flow`), the
ODE samplers and guidance combination (`sampling`), and the EMA of weights (`ema`).
"""
