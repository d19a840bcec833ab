# GPT-2 (124M) pretrained from scratch on FineWeb-Edu (sample-10BT, ~10B GPT-2 tokens).
#   python prepare/fineweb.py                      # ~100 shards of 100M tokens in data/fineweb_edu/
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
# Each step is 16 x 1024 tokens x 32 micro-steps = 524,288 tokens (~0.5M, GPT-3 small's batch). Under
# torchrun the 32 micro-steps are split across the processes, so the same config trains the same model on
# 1, 2, 4, 8, 16 or 32 GPUs, only slower on fewer. On a GPU with less than 40 GB, halve batch_size and
# double gradient_accumulation_steps.

out_dir = "out-gpt2-124m"
wandb_log = False
wandb_project = "fineweb"
wandb_run_name = "gpt2-124m"

dataset = "fineweb_edu"
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

# the GPT-2 small architecture (defaults of train.py, written out for the reader)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

# one pass over ~10B tokens: 10e9 / 524,288 ~= 19,000 steps
learning_rate = 6e-4
max_iters = 19000
lr_decay_iters = 19000
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250
eval_iters = 20  # x 16 x 1024 tokens per split, split across the processes
log_interval = 10
