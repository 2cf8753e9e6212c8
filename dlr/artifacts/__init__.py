"""What a run leaves on disk: run directories, model directories and their card, the fold, the dense export, upgrades and quantized copies."""
