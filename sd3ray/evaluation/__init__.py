"""What a model is judged by while it trains and after: fixed-t validation loss (`validation`), the frozen MNIST
judge (`judge`), FLOPs of a step (`flops`), and the grids and plots people look at (`figures`).
"""
