"""fr_trainer.heads"""
