"""lowbit.passes"""
