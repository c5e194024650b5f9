"""The host: hook specs, component contracts, result types, the scheduler and the numerical passes.

Kept free of heavy imports at package level so that listing plugins stays instant.
"""
