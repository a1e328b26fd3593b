"""Code that the API, the scheduler and the workers share. Imports no torch and none of them."""
