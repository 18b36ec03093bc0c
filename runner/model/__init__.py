"""The tiny GPT-2 (transformers' GPT2LMHeadModel) and the kernels it runs with."""
