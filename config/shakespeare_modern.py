# config/shakespeare.py (nanoGPT's train_shakespeare_char: 6 layers, 384 wide, block 256) with the modern
# recipe: RoPE, RMSNorm, QK-norm, ReLU², untied head, logit softcap, zero-init projections and Muon.
#   python prepare/shakespeare_char.py && python train.py config/shakespeare_modern.py
# Its GPU speed and loss are unmeasured here (no GPU was available); on CPU, bench/recipe.py measures the
# same recipe at the quickstart's size. Same steps as config/shakespeare.py, so the two compare directly.

out_dir = "out-shakespeare-char-modern"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

pos_embedding = "rope"
norm = "rmsnorm"
qk_norm = True
activation = "relu2"
tie_embeddings = False
logit_softcap = 15.0
zero_init_proj = True

optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
