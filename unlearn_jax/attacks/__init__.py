"""Red-team attacks on erased models, over the family interface (docs/METHOD.md §10, README "Robustness").

- `objective`: the original model's trajectories as targets and the velocity-space attack loss.
- `soft`: the conditioning itself optimised (an upper bound: is the concept still reachable?).
- `tokens`: K adversarial tokens added to a prompt, by a gradient-guided coordinate search.
- `ring_a_bell`: a concept vector in the text encoder's space and a token search toward it.
- `config`: the settings every attack run shares.
- `toy`: the attacks run on a toy-world model and judged by the toy detector.
- `checkpoint`: the attacks run on a real pipeline folder, the prompts from a prompt set, judged by NudeNet.
- `report`: attack.json / attack.md / adversarial.csv, and the rows `unlearn-jax eval` adds.
"""
