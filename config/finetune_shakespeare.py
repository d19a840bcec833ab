# Finetune all of GPT-2 XL (1.5B parameters) on tiny Shakespeare in GPT-2 BPE: nanoGPT's finetune_shakespeare.
# Sized for one 80 GB GPU: fp32 weights, gradients and AdamW's two moments take ~25 GB, and a micro-batch
# of one 1024-token sequence keeps the activations well within the rest.
#   python prepare/shakespeare.py
#   python train.py config/finetune_shakespeare.py
#   python sample.py --out_dir=out-shakespeare
# On a smaller GPU, start from a smaller GPT-2: --init_from=gpt2-large (or gpt2-medium, gpt2).
import time

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False  # override via command line if you like
wandb_project = "shakespeare"
wandb_run_name = "ft-" + str(time.time())

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2, downloaded from the Hugging Face hub on first use

# a few steps already overfit this small dataset, so only keep a checkpoint when val improves
always_save_checkpoint = False

# 1 sequence * 32 accumulation steps * 1024 tokens = 32,768 tokens per iteration; the train split has
# ~302k tokens, so 20 iterations are ~2 epochs
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# a small constant learning rate: the model is already trained
learning_rate = 3e-5
decay_lr = False
