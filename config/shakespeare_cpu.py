# The CPU quickstart: a small character-level Shakespeare model on a laptop CPU.
#   python prepare/shakespeare_char.py && python train.py config/shakespeare_cpu.py
# nanoGPT's "baby GPT" CPU command (4 layers, 128 wide, batch 12, 2000 iterations at lr 1e-3) reaches a val
# loss of ~1.88 in about 90 s on two cores. The same model learns as much from fewer, larger batches at a
# higher learning rate with a short warmup, in about half the time; see the README for measured figures.

out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
device = "cpu"
compile = False  # on CPU, compiling takes longer than it saves in a run this short
eval_interval = 700  # evaluate at the start and the end only
eval_iters = 50
log_interval = 50
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 32
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

learning_rate = 6e-3
max_iters = 700
lr_decay_iters = 700
min_lr = 1e-4
warmup_iters = 30
beta2 = 0.99
