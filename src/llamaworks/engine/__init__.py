"""Inference, one way: a backend contract (backend.py) with two implementations (native.py: the C++ kernels,
torch-free; torch_backend.py: model.py on torch), and above them one sequence state, one sampler and one
scheduler (scheduler.py) that generate, chat, serve and eval all use."""
