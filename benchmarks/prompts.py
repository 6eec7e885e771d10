"""Short prompts the serving benchmarks draw from (serve.py, vs_vllm.py); no torch here, so
vs_vllm.py can import it before it sets OpenMP's wait policy."""

#: Short prompts the serving benchmarks draw from (benchmarks/serve.py, benchmarks/vs_vllm.py).
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "My favourite colour is",
    "The three primary colours are",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "The opposite of hot is",
    "Translate to French: good morning",
    "A haiku about the sea:",
    "SELECT name FROM users WHERE",
    "The best way to learn is",
]
