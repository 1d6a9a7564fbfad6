"""One video on several ranks: heads balanced offline across a Ulysses group (`balance`)."""
