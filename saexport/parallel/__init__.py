"""One video on several ranks: heads balanced offline across a Ulysses group (`balance`) and the sparse DiT run
sequence-parallel on yunchang (`ulysses`)."""
