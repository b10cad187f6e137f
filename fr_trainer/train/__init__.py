"""fr_trainer.train"""
