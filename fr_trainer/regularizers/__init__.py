"""fr_trainer.regularizers"""
