"""Non-kernel distillers in Flax (autoencoder, attention matching, trajectory matching): to come.

They follow the same `Method(init, update, support)` protocol as `kip.kip` and run in `kip.loop`.
"""
