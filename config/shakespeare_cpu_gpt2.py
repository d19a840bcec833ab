# The CPU quickstart's model, data and steps (config/shakespeare_cpu.py) with GPT-2's recipe: learned
# position embeddings, LayerNorm, GELU, tied embeddings and AdamW. bench/recipe.py measures the two.
#   python train.py config/shakespeare_cpu_gpt2.py

out_dir = "out-shakespeare-char-cpu-gpt2"
dataset = "shakespeare_char"
device = "cpu"
compile = False  # on CPU, compiling takes longer than it saves in a run this short
eval_interval = 450  # evaluate at the start and the end only
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 16
block_size = 64

n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

learning_rate = 8e-3
max_iters = 450
lr_decay_iters = 450
min_lr = 1e-4
warmup_iters = 30
beta2 = 0.99
