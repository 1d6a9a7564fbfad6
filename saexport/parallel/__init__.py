"""One video on several ranks: heads balanced offline across a Ulysses group (`balance`), the sparse DiT run
sequence-parallel on yunchang (`ulysses`), and a guided step's two passes on two ranks (`cfg`)."""
