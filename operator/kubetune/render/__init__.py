"""Pure functions: FineTuneJob -> the objects and configs that run it."""
