"""What the VAE computes, in torch alone: the config, the plain network, the latent distribution and scaling."""
