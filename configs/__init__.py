"""Training recipes as ml_collections configs, one file per recipe.

``main.py`` loads them with ``ml_collections.config_flags``:
``python main.py --config configs/<recipe>.py``. ``default.py`` holds every key
with the paper's CIFAR recipe; the recipe files start from it and change only
what the recipe needs.
"""
