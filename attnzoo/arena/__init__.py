"""The arena: every mechanism trained and compared on the same data (`attnzoo arena`).

mechanisms.py  one ModelConfig per contestant from a shared Shape (the layers come from attnzoo.mechanisms)
data.py        byte-level corpus (the CPython standard library), MQAR, the needle probe
train.py       AdamW + cosine, one seed for init and data order, checkpoints and resume, tokens/s
distill.py     KL training of the index branches the LM loss cannot reach (DSA, MSA)
evaluate.py    validation loss, MQAR and needle accuracy, decode tokens/s through the engine
recall.py      the recall track: small models trained on MQAR alone, accuracy curves and intervals
noise.py       bootstrap intervals, seed envelopes, "not distinguishable" verdicts
costs.py       FLOPs and KV bytes per token over all layers (each layer priced by its mechanism family)
export.py      trained model -> a directory the engine loads (native checkpoint + byte-level tokenizer)
report.py      results.json -> report.md + PNG plots
cli.py         `attnzoo arena`: options, presets cpu / gpu, the command
plan.py        the runs to do (contestants, replicates, recall seeds, what --resume keeps) and results.json
jobs.py        one run in one process (train, export, reload, evaluate; or a recall-track run)
pool.py        several runs at once, one spawned process each; Ctrl-C stops them at a step boundary
launch.py      data parallel (--nproc): the ranks' context, starting them, what a helper rank trains
"""
