"""Train the toy-world text-to-video model and write its pipeline folder.

The CogVideoX-architecture toy (assets/toy_world):

    taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        python tools/toy/train_toy_model.py --out assets/toy_world --workdir runs/toy_train_final2 \
        --steps 4000 --batch-size 16 --lr 3e-3 --seed 0 --time-limit-min 29

The Wan-architecture toy (assets/toy_world_wan; both cores, other work niced around it):

    nice -n 10 python tools/toy/train_toy_model.py --arch wan --out assets/toy_world_wan \
        --workdir runs/toy_train_wan --steps 3200 --batch-size 16 --lr 3e-3 --seed 0 \
        --timesteps logit_normal --train-shift 1 --flow-shift 3 --time-limit-min 29
"""
import sys

from unlearn_jax.toy.train import main

if __name__ == "__main__":
    sys.exit(main())
