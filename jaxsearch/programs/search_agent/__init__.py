"""The search agent program: assembly (`experiment`), training (`loop`), evaluation
(`evaluate`), workdir loading (`workdir`) and inspection (`inspect_lib`)."""
