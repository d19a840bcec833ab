# Evaluate OpenAI's pretrained GPT-2-medium (350M parameters: n_layer=24, n_head=16, n_embd=1024) on a dataset:
# prints the train and val loss, and the val perplexity (exp of the loss), then exits.
#   python train.py config/eval_gpt2-medium.py                      # on FineWeb-Edu (prepare/fineweb.py)
#   python train.py config/eval_gpt2-medium.py --dataset=shakespeare  # on BPE Shakespeare
init_from = "gpt2-medium"
dataset = "fineweb_edu"
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
