# Evaluate OpenAI's pretrained GPT-2-xl (1558M parameters: n_layer=48, n_head=25, n_embd=1600) on a dataset:
# prints the train and val loss, and the val perplexity (exp of the loss), then exits.
#   python train.py config/eval_gpt2-xl.py                      # on FineWeb-Edu (prepare/fineweb.py)
#   python train.py config/eval_gpt2-xl.py --dataset=shakespeare  # on BPE Shakespeare
init_from = "gpt2-xl"
dataset = "fineweb_edu"
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
