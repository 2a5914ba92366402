"""The synthetic VQA benchmark: procedural scenes (`scenes`) and the question families and splits over them (`vqa`)."""
