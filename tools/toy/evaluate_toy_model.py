"""Generation rate of every toy-world concept for a toy pipeline folder (train / held-out synonyms).

    taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        python tools/toy/evaluate_toy_model.py --model assets/toy_world --n 32 --out runs/toy_eval.json
"""
import sys

from unlearn_jax.toy.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
