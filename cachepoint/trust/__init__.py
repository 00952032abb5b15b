"""Fleet trust: who a certificate names (principal), the identity a node or a person keeps on disk
(key, certificate, the fleet's CA), join tokens, and enrolling with the coordinator.

Value modules here (principal, token) never import grpc; identity and enroll are the edges that do.
"""
