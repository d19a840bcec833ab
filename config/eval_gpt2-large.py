# Evaluate OpenAI's pretrained GPT-2-large (774M parameters: n_layer=36, n_head=20, n_embd=1280) on a dataset:
# prints the train and val loss, and the val perplexity (exp of the loss), then exits.
#   python train.py config/eval_gpt2-large.py                      # on FineWeb-Edu (prepare/fineweb.py)
#   python train.py config/eval_gpt2-large.py --dataset=shakespeare  # on BPE Shakespeare
init_from = "gpt2-large"
dataset = "fineweb_edu"
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
