"""LightningModules: each wraps a plain torch.nn.Module net (trainlab.nets) and trains it.

classifier: Classifier and BinaryClassifier (cross-entropy, accuracy, confusion matrices);
language_model: next-token training of a GPT; gan: a DCGAN; schedulers: learning-rate schedules
the configs name. Write a new one as Lightning's docs teach, or with `training_loss` for the
fast path (docs/making-it-yours.md).
"""
