"""Plain ``nn.Module`` models. No Lightning imports here."""
