"""fr_trainer.data"""
