"""fr_trainer.eval"""
