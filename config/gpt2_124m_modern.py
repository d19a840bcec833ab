# GPT-2 (124M) on FineWeb-Edu shards with the modern recipe, modelled on the modded-nanogpt speedrun's early
# records (RoPE, RMSNorm, QK-norm, ReLU², untied head, logit softcap, zero-init projections, Muon), which
# reached llm.c's GPT-2 val loss (3.28 on FineWeb) in about a third of its tokens.
#   python prepare/fineweb.py
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_modern.py
# Unmeasured here: no GPU was available to this project, so neither its speed nor its loss curve has been
# checked on this config; the learning rates are translated from the speedrun's, not tuned. Muon runs with
# parallel='ddp' (the default), not fsdp. bench/recipe.py measures the same recipe at a small size on CPU.

out_dir = "out-gpt2-124m-modern"
wandb_log = False
wandb_project = "fineweb"
wandb_run_name = "gpt2-124m-modern"

dataset = "fineweb_edu"
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32  # 524,288 tokens per step, as config/gpt2_124m.py

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

pos_embedding = "rope"
norm = "rmsnorm"
qk_norm = True
activation = "relu2"
tie_embeddings = False
logit_softcap = 30.0
zero_init_proj = True

optimizer = "muon"
# Muon's lr is in AdamW's units (torch.optim.Muon's adjust_lr_fn='match_rms_adamw'): 0.01 gives a 768x768
# matrix the per-element update size of the speedrun's lr 0.05 under its own scaling
muon_lr = 0.01
muon_momentum = 0.95
learning_rate = 3e-3  # AdamW's, for the embeddings, the head and the gains
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# about a third of config/gpt2_124m.py's tokens
max_iters = 6500
lr_decay_iters = 6500
warmup_iters = 200
min_lr = 3e-4

eval_interval = 250
eval_iters = 20
log_interval = 10
