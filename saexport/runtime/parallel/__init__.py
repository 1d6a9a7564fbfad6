"""One video on several ranks: heads balanced offline across a Ulysses group (`balance`), the sparse DiT run
sequence-parallel on yunchang (`ulysses`), a guided step's two passes on two ranks (`cfg`), and joining the ranks
torchrun launched (`launch`); and calibration's independent work spread over the ranks (`spread`)."""
