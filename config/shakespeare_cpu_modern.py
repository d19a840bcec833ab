# The CPU quickstart's model, data and steps (config/shakespeare_cpu.py) with the modern recipe: RoPE,
# RMSNorm, QK-norm, ReLU², an untied head, logit softcap, zero-initialized projections and Muon.
#   python train.py config/shakespeare_cpu_modern.py
# bench/recipe.py measures it against the GPT-2 recipe (bench/results/recipe/).

out_dir = "out-shakespeare-char-cpu-modern"
dataset = "shakespeare_char"
device = "cpu"
compile = False
eval_interval = 600
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 32
block_size = 64

n_layer = 3
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

pos_embedding = "rope"
norm = "rmsnorm"
qk_norm = True
activation = "relu2"
tie_embeddings = False
logit_softcap = 15.0
zero_init_proj = True

optimizer = "muon"
learning_rate = 8e-3  # AdamW's: embeddings, head, gains
muon_lr = 0.02
muon_momentum = 0.95
max_iters = 600
lr_decay_iters = 600
min_lr = 1e-4
warmup_iters = 30
beta2 = 0.99
