# The CPU quickstart: a small character-level Shakespeare model on a laptop CPU.
#   python prepare/shakespeare_char.py && python train.py config/shakespeare_cpu.py
# nanoGPT's "baby GPT" CPU command (4 layers, 128 wide, batch 12, 2000 iterations at lr 1e-3) reaches a val
# loss of ~1.88 in about 90 s on two cores. One layer fewer, larger batches and a higher learning rate with
# a short warmup get there in about half the time; the README has the measured figures.

out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
device = "cpu"
compile = False  # on CPU, compiling takes longer than it saves in a run this short
eval_interval = 600  # evaluate at the start and the end only
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

learning_rate = 8e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 1e-4
warmup_iters = 30
beta2 = 0.99
