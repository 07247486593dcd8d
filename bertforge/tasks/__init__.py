"""What is learned: masked-LM pretraining (mlm.py), sequence classification (classification.py)
and the GLUE scorers (scores.py); each task's batches, loss and evaluation."""
