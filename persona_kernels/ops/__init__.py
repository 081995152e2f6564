"""One op per subpackage: accumulate_stats, topk_mask, induce_neurons, masked_linear."""
