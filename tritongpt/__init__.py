"""tritongpt's library: everything train.py, sample.py, bench/ and prepare/ share beyond model.py and kernels/.

Each module does one job and takes its inputs as arguments, so the programs and the tests call the same
functions. Imports point one way: the programs import this package and model.py, which import kernels/;
tests/test_layout.py checks that there is no cycle among them.
"""
