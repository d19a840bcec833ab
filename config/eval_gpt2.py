# Evaluate OpenAI's pretrained GPT-2 (124M parameters: n_layer=12, n_head=12, n_embd=768) on a dataset:
# prints the train and val loss, and the val perplexity (exp of the loss), then exits.
#   python train.py config/eval_gpt2.py                      # on FineWeb-Edu (prepare/fineweb.py)
#   python train.py config/eval_gpt2.py --dataset=shakespeare  # on BPE Shakespeare
init_from = "gpt2"
dataset = "fineweb_edu"
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
