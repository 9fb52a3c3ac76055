def main(): print("cloud_jax")
