"""The quantized model: quantizer modules and fused experts, a recipe's rules, inserting them, the model
view (walkers over quantization points, saved names), the dead-expert bootstrap and the model loaders."""
